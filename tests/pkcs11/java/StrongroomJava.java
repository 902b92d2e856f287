import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.security.Key;
import java.security.KeyFactory;
import java.security.KeyPair;
import java.security.KeyPairGenerator;
import java.security.KeyStore;
import java.security.PrivateKey;
import java.security.Provider;
import java.security.PublicKey;
import java.security.SecureRandom;
import java.security.Security;
import java.security.Signature;
import java.security.spec.MGF1ParameterSpec;
import java.security.spec.PSSParameterSpec;
import java.security.spec.X509EncodedKeySpec;
import java.util.Collections;
import java.util.HexFormat;
import javax.crypto.Cipher;
import javax.crypto.KeyAgreement;
import javax.crypto.KeyGenerator;
import javax.crypto.Mac;
import javax.crypto.SecretKey;
import javax.crypto.spec.GCMParameterSpec;
import javax.crypto.spec.IvParameterSpec;

/**
 * Strongroom through Java's SunPKCS11 provider: the test (tests/pkcs11/test_java.py) writes
 * one command a line on stdin, this answers one line each ("ok ..." or "err <exception>").
 * Usage: java StrongroomJava <SunPKCS11 config>; "login VAR" logs in with the PIN (the app's
 * API key) held in environment variable VAR, never in argv.
 */
public final class StrongroomJava {
    private static final HexFormat HEX = HexFormat.of();

    public static void main(String[] args) throws Exception {
        Provider p = Security.getProvider("SunPKCS11").configure(args[0]);
        Security.addProvider(p);
        KeyStore ks = null;
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        for (String line; (line = in.readLine()) != null; ) {
            String[] a = line.trim().split(" ");
            try {
                switch (a[0]) {
                    case "login": // login <env var holding the PIN>
                        ks = KeyStore.getInstance("PKCS11", p);
                        String pin = System.getenv(a[1]);
                        ks.load(null, pin == null ? null : pin.toCharArray());
                        System.out.println("ok " + p.getName());
                        break;
                    case "aliases": // one "alias:kind:algorithm" per alias
                        StringBuilder sb = new StringBuilder("ok");
                        for (String al : Collections.list(ks.aliases())) {
                            String kind = ks.isKeyEntry(al) ? "key" : ks.isCertificateEntry(al) ? "cert" : "?";
                            Key k = ks.isKeyEntry(al) ? ks.getKey(al, null) : null;
                            sb.append(' ').append(al).append(':').append(kind).append(':')
                                    .append(k == null ? "-" : k.getAlgorithm().replace(' ', '_'));
                        }
                        System.out.println(sb);
                        break;
                    case "sign": { // sign <alias> <algorithm> <data hex> -> signature hex
                        PrivateKey k = (PrivateKey) ks.getKey(a[1], null);
                        Signature s = Signature.getInstance(a[2], p);
                        if (a[2].equals("RSASSA-PSS"))
                            s.setParameter(new PSSParameterSpec("SHA-256", "MGF1", MGF1ParameterSpec.SHA256, 32, 1));
                        s.initSign(k);
                        byte[] data = HEX.parseHex(a[3]);
                        s.update(data, 0, data.length / 2); // two parts: C_SignUpdate
                        s.update(data, data.length / 2, data.length - data.length / 2);
                        byte[] sig = s.sign();
                        // and verified by the provider with the certificate's public key
                        // (imported as a session object: C_CreateObject, C_Verify)
                        Signature v = Signature.getInstance(a[2], p);
                        if (a[2].equals("RSASSA-PSS"))
                            v.setParameter(new PSSParameterSpec("SHA-256", "MGF1", MGF1ParameterSpec.SHA256, 32, 1));
                        v.initVerify(ks.getCertificate(a[1]).getPublicKey());
                        v.update(data);
                        boolean good = v.verify(sig);
                        v.initVerify(ks.getCertificate(a[1]).getPublicKey());
                        v.update(data, 1, data.length - 1);
                        boolean bad = v.verify(sig);
                        System.out.println("ok " + HEX.formatHex(sig) + " " + good + " " + bad);
                        break;
                    }
                    case "encrypt": { // encrypt <alias> <transformation> <data hex> [iv bytes] -> iv hex, ciphertext hex
                        SecretKey k = (SecretKey) ks.getKey(a[1], null);
                        Cipher c = Cipher.getInstance(a[2], p);
                        if (a.length > 4) { // an IV of our own; without it the provider picks one
                            byte[] iv = new byte[Integer.parseInt(a[4])];
                            new SecureRandom().nextBytes(iv);
                            c.init(Cipher.ENCRYPT_MODE, k, a[2].startsWith("AES/GCM")
                                    ? new GCMParameterSpec(128, iv) : new IvParameterSpec(iv));
                        } else {
                            c.init(Cipher.ENCRYPT_MODE, k);
                        }
                        byte[] ct = c.doFinal(HEX.parseHex(a[3]));
                        System.out.println("ok " + HEX.formatHex(c.getIV()) + " " + HEX.formatHex(ct));
                        break;
                    }
                    case "decrypt": { // decrypt <alias> <transformation> <iv hex> <ciphertext hex>
                        SecretKey k = (SecretKey) ks.getKey(a[1], null);
                        Cipher c = Cipher.getInstance(a[2], p);
                        byte[] iv = HEX.parseHex(a[3]);
                        if (a[2].startsWith("AES/GCM"))
                            c.init(Cipher.DECRYPT_MODE, k, new GCMParameterSpec(128, iv));
                        else
                            c.init(Cipher.DECRYPT_MODE, k, new IvParameterSpec(iv));
                        System.out.println("ok " + HEX.formatHex(c.doFinal(HEX.parseHex(a[4]))));
                        break;
                    }
                    case "mac": { // mac <alias> <algorithm> <data hex> -> MAC hex
                        Mac m = Mac.getInstance(a[2], p);
                        m.init(ks.getKey(a[1], null));
                        System.out.println("ok " + HEX.formatHex(m.doFinal(HEX.parseHex(a[3]))));
                        break;
                    }
                    case "rsadecrypt": { // rsadecrypt <alias> <transformation> <ciphertext hex> -> plaintext hex
                        Cipher c = Cipher.getInstance(a[2], p);
                        c.init(Cipher.DECRYPT_MODE, ks.getKey(a[1], null));
                        System.out.println("ok " + HEX.formatHex(c.doFinal(HEX.parseHex(a[3]))));
                        break;
                    }
                    case "ecdh": { // ecdh <alias> <peer SubjectPublicKeyInfo hex> -> shared secret hex
                        KeyAgreement ka = KeyAgreement.getInstance("ECDH", p);
                        ka.init(ks.getKey(a[1], null));
                        PublicKey peer = KeyFactory.getInstance("EC").generatePublic(
                                new X509EncodedKeySpec(HEX.parseHex(a[2])));
                        ka.doPhase(peer, true);
                        System.out.println("ok " + HEX.formatHex(ka.generateSecret()));
                        break;
                    }
                    case "genpair": { // genpair <RSA|EC> <bits> -> algorithm, public key DER hex
                        KeyPairGenerator g = KeyPairGenerator.getInstance(a[1], p);
                        g.initialize(Integer.parseInt(a[2]));
                        KeyPair kp = g.generateKeyPair();
                        Signature s = Signature.getInstance(a[1].equals("RSA") ? "SHA256withRSA" : "SHA256withECDSA", p);
                        s.initSign(kp.getPrivate());
                        s.update(HEX.parseHex(a[3]));
                        System.out.println("ok " + HEX.formatHex(kp.getPublic().getEncoded()) + " "
                                + HEX.formatHex(s.sign()));
                        break;
                    }
                    case "genaes": { // genaes <bits> <data hex>: a session key, encrypts; iv, ct
                        KeyGenerator g = KeyGenerator.getInstance("AES", p);
                        g.init(Integer.parseInt(a[1]));
                        SecretKey k = g.generateKey();
                        Cipher c = Cipher.getInstance("AES/GCM/NoPadding", p);
                        byte[] iv = new byte[12];
                        new SecureRandom().nextBytes(iv);
                        c.init(Cipher.ENCRYPT_MODE, k, new GCMParameterSpec(128, iv));
                        byte[] ct = c.doFinal(HEX.parseHex(a[2]));
                        c.init(Cipher.DECRYPT_MODE, k, new GCMParameterSpec(128, iv));
                        System.out.println("ok " + HEX.formatHex(c.doFinal(ct)));
                        break;
                    }
                    default:
                        System.out.println("err unknown command " + a[0]);
                }
            } catch (Exception e) { // err <exception> <cause> ... : <root cause's message>
                StringBuilder sb = new StringBuilder("err");
                Throwable t = e;
                for (; t.getCause() != null; t = t.getCause())
                    sb.append(' ').append(t.getClass().getName());
                sb.append(' ').append(t.getClass().getName()).append(": ").append(t.getMessage());
                System.out.println(sb.toString().replace('\n', ' '));
            }
            System.out.flush();
        }
    }
}
